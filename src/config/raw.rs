//! Serde mirror of the TOML file. Every table denies unknown keys: a typo must not
//! silently disable a route. Validation and defaults live in `config.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;

pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_CA_CERT: &str = "certs/ca.pem";
pub const DEFAULT_CA_KEY: &str = "certs/ca-key.pem";
pub const DEFAULT_STATE_PATH: &str = "state/tokens.json";
pub const DEFAULT_REFRESH_SKEW: &str = "60s";
pub const DEFAULT_EXPIRES_IN: &str = "1h";
pub const DEFAULT_CONNECT_TIMEOUT: &str = "10s";
pub const DEFAULT_RESPONSE_TIMEOUT: &str = "60s";
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "30s";
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: &str = "10m";
pub const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub ca: RawCa,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub integrations: BTreeMap<String, RawIntegration>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub sidecars: Vec<RawSidecar>,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub max_headers: Option<usize>,
    pub header_read_timeout: Option<String>,
    pub tunnel_idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub listen: Option<String>,
    pub unrouted: Option<String>,
    pub auth: Option<RawProxyAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyAuth {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCa {
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub extra_ca: Option<String>,
    #[serde(default)]
    pub resolve: BTreeMap<String, String>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntegration {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_url: String,
    pub refresh_token: Option<String>,
    pub request_format: Option<String>,
    pub client_auth: Option<String>,
    pub scope: Option<String>,
    pub refresh_skew: Option<String>,
    pub default_expires_in: Option<String>,
    pub authorize_url: Option<String>,
    #[serde(default)]
    pub extra_authorize_params: BTreeMap<String, String>,
    pub redirect_uri: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub host: String,
    pub integration: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub upstream_tls: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSidecar {
    pub listen: String,
    pub upstream: String,
}
