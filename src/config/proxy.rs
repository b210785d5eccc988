//! `[proxy]` and `[admin]`: the listeners, unrouted traffic, proxy and admin credentials.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{ConfigError, Validator};
use crate::secret::Secret;

pub(super) const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8080";
pub(super) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) listen: Option<String>,
    pub(super) unrouted: Option<String>,
    pub(super) auth: Option<RawProxyAuth>,
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
    pub(super) fn proxy(&self, raw: RawProxy) -> Result<ProxyConfig, ConfigError> {
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

    pub(super) fn admin(&self, raw: RawAdmin) -> Result<AdminConfig, ConfigError> {
        Ok(AdminConfig {
            listen: self.socket_addr(
                "admin.listen",
                raw.listen.as_deref(),
                DEFAULT_ADMIN_LISTEN,
            )?,
            token: raw.token.map(Secret::new),
        })
    }
}
