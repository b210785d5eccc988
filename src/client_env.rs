//! The environment variables that point a program at credproxy: the proxy (with
//! its credentials) and the CA files, under every name the common HTTP stacks
//! read. `exec` sets them in its child; `credproxy env` prints them for a shell.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use url::Url;

use crate::config::ProxyClient;

/// curl, Python, Go, git, the AWS CLI and Node (with `NODE_USE_ENV_PROXY`) read
/// these; some only the lowercase form, some only the uppercase one.
const PROXY_VARS: [&str; 4] = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"];
const NO_PROXY_VARS: [&str; 2] = ["NO_PROXY", "no_proxy"];
/// The proxy is on loopback; so may be other local services the program talks to.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Each names a PEM bundle that *replaces* the default trust store, so it gets
/// the system roots plus the local CA: unrouted hosts must still verify.
const BUNDLE_VARS: [&str; 6] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "PIP_CERT",
];

/// How `credproxy env` prints the variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `export NAME='value'` lines, for `eval "$(credproxy env)"` in sh, bash, zsh.
    Sh,
    /// `set -gx NAME 'value'` lines, for `credproxy env --format fish | source`.
    Fish,
    /// One JSON object, name → value.
    Json,
}

/// The variables, in a fixed order. No `Debug`: the proxy URL holds the proxy password.
pub struct ClientEnv {
    vars: Vec<(&'static str, String)>,
}

impl ClientEnv {
    /// `proxy` is the proxy URL, `bundle` the system roots + local CA, `ca_cert` the
    /// local CA alone (Node adds it to its own roots), `no_proxy` the value already
    /// in effect (see [`inherited_no_proxy`]), which is kept. Paths are made
    /// absolute: the program may change directory.
    pub fn new(proxy: &str, bundle: &Path, ca_cert: &Path, no_proxy: Option<&str>) -> Self {
        let mut vars = Vec::new();
        for name in PROXY_VARS {
            vars.push((name, proxy.to_owned()));
        }
        let no_proxy = extend_no_proxy(no_proxy.unwrap_or_default());
        for name in NO_PROXY_VARS {
            vars.push((name, no_proxy.clone()));
        }
        let bundle = absolute(bundle);
        for name in BUNDLE_VARS {
            vars.push((name, bundle.clone()));
        }
        vars.push(("NODE_EXTRA_CA_CERTS", absolute(ca_cert)));
        // Node ≥ 24 honours HTTPS_PROXY in fetch and https only when asked to.
        vars.push(("NODE_USE_ENV_PROXY", "1".to_owned()));
        Self { vars }
    }

    pub fn vars(&self) -> &[(&'static str, String)] {
        &self.vars
    }

    /// The variables as `format` source text, one per line (JSON: one object).
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Sh => self.lines(|name, value| format!("export {name}={}", sh_quote(value))),
            Format::Fish => {
                self.lines(|name, value| format!("set -gx {name} {}", fish_quote(value)))
            }
            Format::Json => {
                let object: serde_json::Map<String, serde_json::Value> = self
                    .vars
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), value.as_str().into()))
                    .collect();
                format!("{}\n", serde_json::Value::Object(object))
            }
        }
    }

    /// One line per variable.
    fn lines(&self, line: impl Fn(&str, &str) -> String) -> String {
        self.vars
            .iter()
            .map(|(name, value)| line(name, value) + "\n")
            .collect()
    }
}

/// `http://NAME:PASSWORD@HOST:PORT` for a proxy listening on `listen` used by
/// `client`, the credentials percent-encoded. A wildcard listen address is
/// reached on loopback.
pub fn proxy_url(listen: SocketAddr, client: Option<&ProxyClient>) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let base = format!("http://{}", SocketAddr::new(ip, listen.port()));
    let Ok(mut url) = Url::parse(&base) else {
        // Unreachable: a socket address always makes a valid URL.
        return base;
    };
    if let Some(client) = client {
        // Both only fail for URLs that cannot have credentials; http:// can.
        let _ = url.set_username(&client.name);
        let _ = url.set_password(Some(client.password.expose()));
    }
    url.as_str().trim_end_matches('/').to_owned()
}

/// The `NO_PROXY` (or `no_proxy`) value of this process's environment.
pub fn inherited_no_proxy() -> Option<String> {
    std::env::var("NO_PROXY")
        .or_else(|_| std::env::var("no_proxy"))
        .ok()
}

fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .as_deref()
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// `existing` plus the loopback hosts it lacks.
fn extend_no_proxy(existing: &str) -> String {
    let mut entries: Vec<&str> = existing
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect();
    for host in LOOPBACK_HOSTS {
        if !entries.contains(&host) {
            entries.push(host);
        }
    }
    entries.join(",")
}

/// Single quotes keep everything literal in sh; a quote itself is closed,
/// escaped and reopened.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// In fish's single quotes only `\\` and `\'` are escapes.
fn fish_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', r"\\").replace('\'', r"\'"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn client(name: &str, password: &str) -> ProxyClient {
        ProxyClient::with_all_routes(name, Secret::new(password))
    }

    mod proxy_url {
        use super::*;

        #[test]
        fn percent_encodes_credentials() {
            let url = proxy_url(
                "127.0.0.1:8080".parse().unwrap(),
                Some(&client("ci steps", "p@ss:w/rd")),
            );
            assert_eq!(url, "http://ci%20steps:p%40ss%3Aw%2Frd@127.0.0.1:8080");
        }

        #[test]
        fn wildcard_listen_is_reached_on_loopback() {
            assert_eq!(
                proxy_url("0.0.0.0:8080".parse().unwrap(), None),
                "http://127.0.0.1:8080"
            );
            assert_eq!(
                proxy_url("[::]:8080".parse().unwrap(), None),
                "http://[::1]:8080"
            );
        }
    }

    mod no_proxy {
        use super::*;

        #[test]
        fn keeps_existing_entries_and_adds_loopback_once() {
            assert_eq!(
                extend_no_proxy(" .corp.example, localhost ,"),
                ".corp.example,localhost,127.0.0.1,::1"
            );
            assert_eq!(extend_no_proxy(""), "localhost,127.0.0.1,::1");
        }
    }

    mod render {
        use super::*;

        fn env() -> ClientEnv {
            ClientEnv::new(
                "http://u:it's@127.0.0.1:1",
                Path::new("/tmp/b\\ndle.pem"),
                Path::new("/tmp/ca.pem"),
                None,
            )
        }

        #[test]
        fn sh_quotes_single_quotes() {
            let text = env().render(Format::Sh);
            assert!(
                text.contains("export HTTPS_PROXY='http://u:it'\\''s@127.0.0.1:1'\n"),
                "{text}"
            );
        }

        #[test]
        fn fish_escapes_quotes_and_backslashes() {
            let text = env().render(Format::Fish);
            assert!(
                text.contains("set -gx HTTPS_PROXY 'http://u:it\\'s@127.0.0.1:1'\n"),
                "{text}"
            );
            assert!(
                text.contains("set -gx SSL_CERT_FILE '/tmp/b\\\\ndle.pem'\n"),
                "{text}"
            );
        }

        #[test]
        fn json_holds_every_variable() {
            let env = env();
            let json: serde_json::Value = serde_json::from_str(&env.render(Format::Json)).unwrap();
            assert_eq!(json.as_object().unwrap().len(), env.vars().len());
            assert_eq!(json["NODE_USE_ENV_PROXY"], "1");
        }
    }
}
