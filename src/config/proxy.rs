//! `[proxy]` and `[admin]`: the listeners, unrouted traffic and where it may
//! go, the proxy's clients and the admin credentials.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{ConfigError, Route, Validator};
use crate::egress::{AddressClass, AllowEntry, Policy};
use crate::routes::HostPattern;
use crate::secret::Secret;

pub(super) const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8080";
pub(super) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub unrouted: Unrouted,
    /// `[[proxy.clients]]`, or `proxy.auth` as one client with every route.
    /// Empty: anyone who can reach the listener, with every route.
    pub clients: Vec<ProxyClient>,
    /// `proxy.allow` and `proxy.block`: where unrouted traffic may go.
    pub egress: Policy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    Tunnel,
    Deny,
}

/// One program or team using the proxy: `Proxy-Authorization: Basic
/// base64(name:password)`.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    pub name: String,
    pub password: Secret,
    pub routes: ClientRoutes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRoutes {
    All,
    /// Route hosts, as in `[[routes]]`.
    Only(Vec<HostPattern>),
}

impl ProxyClient {
    /// A client that may use every route: what `proxy.auth` means, and the
    /// one-client form for a proxy started with a one-time password.
    pub fn with_all_routes(name: impl Into<String>, password: Secret) -> Self {
        Self {
            name: name.into(),
            password,
            routes: ClientRoutes::All,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<Secret>,
    /// The file has an `[admin]` table: `exec` runs an admin listener only then.
    pub configured: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) listen: Option<String>,
    pub(super) unrouted: Option<String>,
    pub(super) auth: Option<RawProxyAuth>,
    #[serde(default)]
    pub(super) clients: Vec<RawClient>,
    #[serde(default)]
    pub(super) allow: Vec<String>,
    pub(super) block: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) name: String,
    pub(super) password: String,
    pub(super) routes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxyAuth {
    pub(super) username: String,
    pub(super) password: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) token: Option<String>,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn proxy(
        &self,
        raw: RawProxy,
        routes: &[Route],
    ) -> Result<ProxyConfig, ConfigError> {
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
        let clients = match raw.auth {
            Some(_) if !raw.clients.is_empty() => {
                return Err(self.err(
                    "proxy.auth",
                    "set proxy.auth or [[proxy.clients]], not both (proxy.auth is one client with every route)",
                ));
            }
            Some(auth) if auth.username.is_empty() || auth.password.is_empty() => {
                return Err(self.err("proxy.auth", "username and password must not be empty"));
            }
            Some(auth) => vec![ProxyClient::with_all_routes(
                auth.username,
                Secret::new(auth.password),
            )],
            None => raw
                .clients
                .into_iter()
                .enumerate()
                .map(|(index, client)| self.client(index, client, routes))
                .collect::<Result<_, _>>()?,
        };
        for (index, client) in clients.iter().enumerate() {
            if clients[..index].iter().any(|c| c.name == client.name) {
                return Err(self.err(
                    format!("proxy.clients[{index}].name"),
                    format!("{:?} is used twice", client.name),
                ));
            }
        }
        Ok(ProxyConfig {
            listen: self.socket_addr(
                "proxy.listen",
                raw.listen.as_deref(),
                DEFAULT_PROXY_LISTEN,
            )?,
            unrouted,
            clients,
            egress: self.egress(raw.allow, raw.block)?,
        })
    }

    fn client(
        &self,
        index: usize,
        raw: RawClient,
        routes: &[Route],
    ) -> Result<ProxyClient, ConfigError> {
        let key = |field: &str| format!("proxy.clients[{index}].{field}");
        // The name is a metric label and a log field: keep it plain.
        let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
        if !raw.name.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !raw.name.chars().all(plain)
        {
            return Err(self.err(
                key("name"),
                format!("{:?} must start with a letter or digit and use only letters, digits, '-', '_' and '.'", raw.name),
            ));
        }
        if raw.password.is_empty() {
            return Err(self.err(key("password"), "must not be empty"));
        }
        let mut only = Vec::new();
        for (i, host) in raw.routes.iter().enumerate() {
            if host == "*" {
                return Ok(ProxyClient::with_all_routes(
                    raw.name,
                    Secret::new(raw.password),
                ));
            }
            let pattern = HostPattern::parse(host)
                .ok()
                .filter(|p| routes.iter().any(|r| r.host == *p))
                .ok_or_else(|| {
                    self.err(
                        format!("proxy.clients[{index}].routes[{i}]"),
                        format!("no [[routes]] entry has host {host:?} (write it as in [[routes]], or \"*\" for all)"),
                    )
                })?;
            only.push(pattern);
        }
        Ok(ProxyClient {
            name: raw.name,
            password: Secret::new(raw.password),
            routes: ClientRoutes::Only(only),
        })
    }

    fn egress(
        &self,
        allow: Vec<String>,
        block: Option<Vec<String>>,
    ) -> Result<Policy, ConfigError> {
        let block = match block {
            None => AddressClass::DEFAULT_BLOCK.to_vec(),
            Some(names) => {
                let mut classes = Vec::new();
                for (index, name) in names.iter().enumerate() {
                    let named: &[AddressClass] = match name.as_str() {
                        "all-private" => &AddressClass::ALL,
                        name => match AddressClass::ALL.iter().find(|c| c.name() == name) {
                            Some(class) => std::slice::from_ref(class),
                            None => {
                                return Err(self.err(
                                    format!("proxy.block[{index}]"),
                                    format!("{name:?} is not \"loopback\", \"link-local\", \"private\" or \"all-private\""),
                                ));
                            }
                        },
                    };
                    for class in named {
                        if !classes.contains(class) {
                            classes.push(*class);
                        }
                    }
                }
                classes
            }
        };
        let allow = allow
            .iter()
            .enumerate()
            .map(|(index, text)| {
                AllowEntry::parse(text).map_err(|m| self.err(format!("proxy.allow[{index}]"), m))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let policy = Policy::new(allow, block);
        for (index, entry) in policy.allow().iter().enumerate() {
            if let AllowEntry::Net(net) = entry
                && let Some(class) = policy.blocked_class_of(net)
            {
                return Err(self.err(
                    format!("proxy.allow[{index}]"),
                    format!("{net} is {class}, which proxy.block refuses (block wins): this entry could never allow anything"),
                ));
            }
        }
        Ok(policy)
    }

    pub(super) fn admin(&self, raw: Option<RawAdmin>) -> Result<AdminConfig, ConfigError> {
        let configured = raw.is_some();
        let raw = raw.unwrap_or_default();
        Ok(AdminConfig {
            listen: self.socket_addr(
                "admin.listen",
                raw.listen.as_deref(),
                DEFAULT_ADMIN_LISTEN,
            )?,
            token: raw.token.map(Secret::new),
            configured,
        })
    }
}
