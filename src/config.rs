//! The validated configuration: `load(path)` reads the TOML file, expands
//! `${VAR}`, maps it onto the serde mirror in `config/raw.rs` and checks every
//! value. Any problem is a `ConfigError` naming the file, the key path and the cause.

pub mod duration;
mod expand;
mod raw;
pub mod template;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use reqwest::Url;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::routes::{self, HostPattern};
use crate::secret::Secret;
use raw::*;
use template::Template;

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
}

/// Bounds on what clients can make the proxy hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections (proxy and sidecar listeners together).
    pub max_connections: usize,
    /// Bytes of one request head (request line + headers).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// A client must send a complete request head within this time; an
    /// HTTP/1.1 keep-alive connection waiting for its next request is waiting
    /// for a head too, so this is also the idle timeout.
    pub header_read_timeout: Duration,
    /// A blind tunnel with no bytes either way is closed after this.
    pub tunnel_idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub unrouted: Unrouted,
    pub auth: Option<ProxyAuth>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    Tunnel,
    Deny,
}

#[derive(Debug, Clone)]
pub struct ProxyAuth {
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct CaConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub extra_ca: Option<ExtraCa>,
    pub connect_timeout: Duration,
    /// From sending the request until the response head arrives.
    pub response_timeout: Duration,
    /// `host:port` (host lower-cased) → address, like curl's `--resolve`.
    pub resolve: HashMap<String, SocketAddr>,
}

impl UpstreamConfig {
    pub fn resolve(&self, host: &str, port: u16) -> Option<SocketAddr> {
        self.resolve
            .get(&format!("{}:{port}", routes::normalize(host)))
            .copied()
    }
}

/// Certificates trusted for upstream TLS in addition to the system roots.
#[derive(Clone, PartialEq)]
pub struct ExtraCa {
    pub path: PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for ExtraCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ExtraCa({}, {} certs)",
            self.path.display(),
            self.certs.len()
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFormat {
    Form,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Basic,
    Body,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IntegrationConfig {
    pub name: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub refresh_url: Url,
    /// None once `credproxy authorize` has stored one in the state file.
    pub refresh_token: Option<Secret>,
    pub request_format: RequestFormat,
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub refresh_skew: Duration,
    pub default_expires_in: Duration,
    pub authorize_url: Option<Url>,
    pub extra_authorize_params: BTreeMap<String, String>,
    pub redirect_uri: Url,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub host: HostPattern,
    /// The integration whose token the headers carry, if any.
    pub integration: Option<String>,
    pub headers: Vec<(HeaderName, Template)>,
    pub upstream_tls: bool,
}

#[derive(Debug, Clone)]
pub struct Sidecar {
    pub listen: SocketAddr,
    pub upstream: Url,
}

// === impl Config ===

impl Config {
    pub fn integration(&self, name: &str) -> Option<&IntegrationConfig> {
        self.integrations.iter().find(|i| i.name == name)
    }
}

/// Reads and validates the config file at `path`, expanding `${VAR}` from the
/// process environment.
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
    raw.and_then(|raw| Validator { path }.config(raw))
        .map_err(|error| redact(error, &substituted))
}

/// Errors quote bad values; a value that came from `${VAR}` may be a secret
/// (a token pasted into the wrong variable), so it is shown by name only.
fn redact(error: ConfigError, substituted: &[String]) -> ConfigError {
    match error {
        ConfigError::Invalid {
            path,
            key,
            mut message,
        } => {
            for value in substituted.iter().filter(|v| v.len() >= 4) {
                message = message.replace(value.as_str(), "[value from the environment]");
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
        let routes = raw
            .routes
            .into_iter()
            .enumerate()
            .map(|(index, r)| self.route(index, r, &names))
            .collect::<Result<Vec<_>, _>>()?;
        for (index, route) in routes.iter().enumerate() {
            if routes[..index].iter().any(|r| r.host == route.host) {
                return Err(self.err(
                    format!("routes[{index}].host"),
                    format!("{} is routed twice", route.host),
                ));
            }
        }
        let table = routes::RouteTable::new(routes.iter().map(|r| &r.host));
        let sidecars = raw
            .sidecars
            .into_iter()
            .enumerate()
            .map(|(index, s)| self.sidecar(index, s, &table))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            source: self.path.to_owned(),
            proxy: self.proxy(raw.proxy)?,
            admin: AdminConfig {
                listen: self.socket_addr(
                    "admin.listen",
                    raw.admin.listen.as_deref(),
                    DEFAULT_ADMIN_LISTEN,
                )?,
                token: raw.admin.token.map(Secret::new),
            },
            ca: CaConfig {
                cert: raw.ca.cert.unwrap_or_else(|| DEFAULT_CA_CERT.into()).into(),
                key: raw.ca.key.unwrap_or_else(|| DEFAULT_CA_KEY.into()).into(),
            },
            state: StateConfig {
                path: raw
                    .state
                    .path
                    .unwrap_or_else(|| DEFAULT_STATE_PATH.into())
                    .into(),
            },
            upstream: self.upstream(raw.upstream)?,
            integrations,
            routes,
            sidecars,
            limits: self.limits(raw.limits)?,
        })
    }

    fn limits(&self, raw: RawLimits) -> Result<Limits, ConfigError> {
        let positive = |key: &str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(self.err(key, "must be at least 1")),
            value => Ok(value.unwrap_or(default)),
        };
        let max_header_bytes = positive(
            "limits.max_header_bytes",
            raw.max_header_bytes,
            DEFAULT_MAX_HEADER_BYTES,
        )?;
        if max_header_bytes < 8192 {
            return Err(self.err("limits.max_header_bytes", "must be at least 8192"));
        }
        Ok(Limits {
            max_connections: positive(
                "limits.max_connections",
                raw.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            )?,
            max_header_bytes,
            max_headers: positive("limits.max_headers", raw.max_headers, DEFAULT_MAX_HEADERS)?,
            header_read_timeout: self.duration(
                "limits.header_read_timeout",
                raw.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
            )?,
            tunnel_idle_timeout: self.duration(
                "limits.tunnel_idle_timeout",
                raw.tunnel_idle_timeout,
                DEFAULT_TUNNEL_IDLE_TIMEOUT,
            )?,
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

    fn proxy(&self, raw: RawProxy) -> Result<ProxyConfig, ConfigError> {
        let unrouted = match raw.unrouted.as_deref() {
            None | Some("tunnel") => Unrouted::Tunnel,
            Some("deny") => Unrouted::Deny,
            Some(other) => {
                return Err(self.err(
                    "proxy.unrouted",
                    format!("{other:?} is not \"tunnel\" or \"deny\""),
                ));
            }
        };
        let auth = match raw.auth {
            Some(auth) if auth.username.is_empty() || auth.password.is_empty() => {
                return Err(self.err("proxy.auth", "username and password must not be empty"));
            }
            Some(auth) => Some(ProxyAuth {
                username: auth.username,
                password: Secret::new(auth.password),
            }),
            None => None,
        };
        Ok(ProxyConfig {
            listen: self.socket_addr(
                "proxy.listen",
                raw.listen.as_deref(),
                DEFAULT_PROXY_LISTEN,
            )?,
            unrouted,
            auth,
        })
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

    fn upstream(&self, raw: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let extra_ca = match raw.extra_ca {
            Some(file) => Some(self.extra_ca(PathBuf::from(file))?),
            None => None,
        };
        let mut resolve = HashMap::new();
        for (target, addr) in raw.resolve {
            let key = format!("upstream.resolve.\"{target}\"");
            let (host, port) = target
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty())
                .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
                .ok_or_else(|| self.err(&key, format!("{target:?} is not \"host:port\"")))?;
            let addr = addr.parse::<SocketAddr>().map_err(|_| {
                self.err(
                    &key,
                    format!("{addr:?} is not an address like \"127.0.0.1:8443\""),
                )
            })?;
            resolve.insert(format!("{}:{port}", routes::normalize(host)), addr);
        }
        Ok(UpstreamConfig {
            extra_ca,
            resolve,
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                raw.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            response_timeout: self.duration(
                "upstream.response_timeout",
                raw.response_timeout,
                DEFAULT_RESPONSE_TIMEOUT,
            )?,
        })
    }

    fn extra_ca(&self, path: PathBuf) -> Result<ExtraCa, ConfigError> {
        let key = "upstream.extra_ca";
        let bytes = std::fs::read(&path)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                self.err(
                    key,
                    format!("{}: not a PEM certificate file: {e}", path.display()),
                )
            })?;
        if certs.is_empty() {
            return Err(self.err(key, format!("{} holds no PEM certificate", path.display())));
        }
        Ok(ExtraCa { path, certs })
    }

    fn integration(
        &self,
        name: String,
        raw: RawIntegration,
    ) -> Result<IntegrationConfig, ConfigError> {
        let key = |field: &str| format!("integrations.{name}.{field}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(self.err(
                format!("integrations.{name}"),
                "integration names may only use letters, digits, '_' and '-'",
            ));
        }
        if raw.client_id.is_empty() {
            return Err(self.err(key("client_id"), "must not be empty"));
        }
        let refresh_url = self.url(&key("refresh_url"), &raw.refresh_url)?;
        if refresh_url.scheme() != "https" && !is_loopback_url(&refresh_url) {
            return Err(self.err(
                key("refresh_url"),
                "must be https (plain http is allowed only to a loopback host): it carries the client secret",
            ));
        }
        let refresh_token = match raw.refresh_token {
            Some(token) if token.is_empty() => {
                return Err(self.err(
                    key("refresh_token"),
                    "is empty (leave it out to use `credproxy authorize`)",
                ));
            }
            token => token.map(Secret::new),
        };
        let request_format = match raw.request_format.as_deref() {
            None | Some("form") => RequestFormat::Form,
            Some("json") => RequestFormat::Json,
            Some(other) => {
                return Err(self.err(
                    key("request_format"),
                    format!("{other:?} is not \"form\" or \"json\""),
                ));
            }
        };
        let client_auth = match raw.client_auth.as_deref() {
            None | Some("basic") => ClientAuth::Basic,
            Some("body") => ClientAuth::Body,
            Some(other) => {
                return Err(self.err(
                    key("client_auth"),
                    format!("{other:?} is not \"basic\" or \"body\""),
                ));
            }
        };
        let duration = |field: &str, value: Option<String>, default: &str| {
            duration::parse(value.as_deref().unwrap_or(default))
                .map_err(|m| self.err(key(field), m))
        };
        let refresh_skew = duration("refresh_skew", raw.refresh_skew, DEFAULT_REFRESH_SKEW)?;
        let default_expires_in = duration(
            "default_expires_in",
            raw.default_expires_in,
            DEFAULT_EXPIRES_IN,
        )?;
        if default_expires_in.is_zero() {
            return Err(self.err(key("default_expires_in"), "must be longer than zero"));
        }
        let authorize_url = match raw.authorize_url {
            Some(url) => Some(self.url(&key("authorize_url"), &url)?),
            None => None,
        };
        let redirect_uri = self.url(
            &key("redirect_uri"),
            raw.redirect_uri.as_deref().unwrap_or(DEFAULT_REDIRECT_URI),
        )?;
        if redirect_uri.scheme() != "http"
            || !is_loopback_url(&redirect_uri)
            || redirect_uri.port().is_none()
        {
            return Err(self.err(
                key("redirect_uri"),
                "must be a loopback http URL with a port, like \"http://127.0.0.1:8765/callback\"",
            ));
        }
        Ok(IntegrationConfig {
            client_id: raw.client_id,
            client_secret: Secret::new(raw.client_secret),
            refresh_url,
            refresh_token,
            request_format,
            client_auth,
            scope: raw.scope.filter(|s| !s.is_empty()),
            refresh_skew,
            default_expires_in,
            authorize_url,
            extra_authorize_params: raw.extra_authorize_params,
            redirect_uri,
            name,
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

    fn route(
        &self,
        index: usize,
        raw: RawRoute,
        integrations: &[&str],
    ) -> Result<Route, ConfigError> {
        let key = |field: &str| format!("routes[{index}].{field}");
        let host = HostPattern::parse(&raw.host).map_err(|m| self.err(key("host"), m))?;
        let known = |field: String, name: &str| {
            if integrations.contains(&name) {
                Ok(())
            } else {
                Err(self.err(
                    field,
                    format!("no integration named {name:?} (see [integrations.*])"),
                ))
            }
        };
        let mut headers = Vec::new();
        let mut integration = raw.integration;
        if let Some(name) = &integration {
            known(key("integration"), name)?;
            headers.push((http::header::AUTHORIZATION, Template::bearer(name)));
        }
        for (name, text) in raw.headers {
            let field = key(&format!("headers.{name}"));
            let header = HeaderName::try_from(name.as_str())
                .map_err(|_| self.err(&field, format!("{name:?} is not a valid header name")))?;
            if is_reserved_header(&header) {
                return Err(self.err(
                    &field,
                    format!("{name} is managed by the proxy and cannot be set"),
                ));
            }
            if headers.iter().any(|(existing, _)| *existing == header) {
                return Err(self.err(
                    &field,
                    format!("{name} is set twice (the integration shorthand sets Authorization)"),
                ));
            }
            let template = Template::parse(&text).map_err(|m| self.err(&field, m))?;
            if let Some(name) = template.integration() {
                known(field.clone(), name)?;
                match &integration {
                    Some(existing) if existing != name => {
                        return Err(self.err(
                            &field,
                            format!("refers to {name:?} but this route uses {existing:?}; a route carries one integration's token"),
                        ));
                    }
                    _ => integration = Some(name.to_owned()),
                }
            }
            headers.push((header, template));
        }
        if headers.is_empty() {
            return Err(self.err(
                format!("routes[{index}]"),
                "injects nothing: set `integration` or `headers`",
            ));
        }
        Ok(Route {
            host,
            integration,
            headers,
            upstream_tls: raw.upstream_tls.unwrap_or(true),
        })
    }

    fn sidecar(
        &self,
        index: usize,
        raw: RawSidecar,
        table: &routes::RouteTable,
    ) -> Result<Sidecar, ConfigError> {
        let key = |field: &str| format!("sidecars[{index}].{field}");
        let listen = self.socket_addr(&key("listen"), Some(&raw.listen), "")?;
        if !listen.ip().is_loopback() {
            // A sidecar has no client authentication: its pod's loopback is the boundary.
            return Err(self.err(
                key("listen"),
                format!("{listen} is not a loopback address; sidecars listen on loopback only"),
            ));
        }
        let upstream = self.url(&key("upstream"), &raw.upstream)?;
        let host = routes::normalize(upstream.host_str().unwrap_or_default());
        if table.lookup(&host).is_none() {
            return Err(self.err(
                key("upstream"),
                format!("no [[routes]] entry matches host {host:?}"),
            ));
        }
        Ok(Sidecar { listen, upstream })
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

/// Headers that describe the connection or the message framing, never a credential.
fn is_reserved_header(name: &HeaderName) -> bool {
    use http::header::*;
    [
        HOST,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        CONNECTION,
        UPGRADE,
        TE,
        PROXY_AUTHORIZATION,
    ]
    .contains(name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
        assert_eq!(dropbox.client_secret.expose(), "cs-SECRET");
        assert_eq!(dropbox.request_format, RequestFormat::Json);
        assert_eq!(dropbox.client_auth, ClientAuth::Body);
        assert_eq!(dropbox.refresh_skew, Duration::from_secs(90));
        assert_eq!(dropbox.default_expires_in, Duration::from_secs(4 * 3600));
        assert_eq!(dropbox.redirect_uri.as_str(), DEFAULT_REDIRECT_URI);
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

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let config = parse_text("").unwrap();
        assert_eq!(config.proxy.listen.to_string(), DEFAULT_PROXY_LISTEN);
        assert_eq!(config.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(config.state.path, PathBuf::from(DEFAULT_STATE_PATH));
        assert_eq!(config.proxy.unrouted, Unrouted::Tunnel);
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
}
